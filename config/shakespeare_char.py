# The "baby GPT" on one GPU: character-level Tiny Shakespeare, 10.7M parameters.
# python prepare_shakespeare.py && python train.py config/shakespeare_char.py
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"

n_layer = 6  # 6 layers, 6 heads, 384 wide
n_head = 6
n_embd = 384
block_size = 256  # 256 characters of context
batch_size = 64
dropout = 0.2  # 1M characters is little data for 10M parameters: regularise

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 0  # 0 = max_iters: decay all the way down at the end
min_lr = 1e-4
warmup_iters = 100
beta2 = 0.99

eval_interval = 250
eval_iters = 200
log_interval = 10
checkpoint_interval = 1000
compile = True  # worth it on a GPU for 5000 steps
