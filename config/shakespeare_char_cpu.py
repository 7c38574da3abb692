# A laptop recipe: a small character-level GPT on Tiny Shakespeare, a few minutes on a CPU.
# First: python prepare_shakespeare.py        Then: python train.py config/shakespeare_char_cpu.py
out_dir = "out-shakespeare-char-cpu"  # its own folder: the GPU recipe writes out-shakespeare-char
dataset = "shakespeare_char"  # 65 characters; data/shakespeare_char from prepare_shakespeare.py
device = "cpu"  # small enough that a GPU would mostly wait on Python
compile = False  # compiling takes longer than this whole run saves

n_layer = 4  # a 0.8M-parameter model: 4 layers, 4 heads, 128 wide
n_head = 4
n_embd = 128
block_size = 64  # characters of context
batch_size = 12  # sequences per step: 768 characters
dropout = 0.0  # too small a model to overfit in 2000 steps

learning_rate = 1e-3  # small models tolerate a high learning rate
max_iters = 2000
lr_decay_iters = 0  # 0 = max_iters: decay all the way down at the end (also with a lower --max_iters)
min_lr = 1e-4  # learning_rate / 10
warmup_iters = 100
beta2 = 0.99  # few tokens per step: average the squared gradients a little longer

eval_interval = 250  # a val loss every 250 steps
eval_iters = 200  # over 200 batches (the whole val split is 111k characters)
log_interval = 10
checkpoint_interval = 500
