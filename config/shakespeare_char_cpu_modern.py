# The laptop recipe (shakespeare_char_cpu.py) with Muon: the same model size, data and schedule,
# and what did best on a CPU in docs/modern.md's measurements.
# First: python prepare_shakespeare.py    Then: python train.py config/shakespeare_char_cpu_modern.py
out_dir = "out-shakespeare-char-modern"
dataset = "shakespeare_char"  # 65 characters; data/shakespeare_char from prepare_shakespeare.py
device = "cpu"  # small enough that a GPU would mostly wait on Python
compile = False  # compiling takes longer than this whole run saves

n_layer = 4  # the laptop recipe's 0.8M-parameter model: 4 layers, 4 heads, 128 wide
n_head = 4
n_embd = 128
block_size = 64  # characters of context
batch_size = 12  # sequences per step: 768 characters
dropout = 0.0  # too small a model to overfit in 2000 steps
# the from-scratch options stay off: at this size none of them helped Muon (docs/modern.md)
qk_norm = False  # on: val within 0.002 of off at step 1000
mlp = "gelu"  # relu2: 0.08 worse at step 1000 (at muon_lr 0.02, not retuned)
zero_init_proj = False  # on: 0.01 worse
tie_embeddings = True  # untied: 0.004 worse, 8k more parameters

optimizer = "muon"  # Muon for the blocks' matrices; AdamW (learning_rate below) for the rest
muon_lr = 0.02  # Muon's peak: the best of 0.01 / 0.02 / 0.04 in docs/modern.md's sweep
muon_momentum = 0.95  # Muon's usual Nesterov momentum
muon_weight_decay = 0.0  # no decay on the matrices: too few steps to overfit
learning_rate = 1e-3  # AdamW's peak, for embeddings, lm_head, gains and biases
max_iters = 2000
lr_decay_iters = 0  # 0 = max_iters: decay all the way down at the end (also with a lower --max_iters)
min_lr = 1e-4  # learning_rate / 10 (Muon's floor is muon_lr / 10: the schedule scales both)
warmup_iters = 100
beta2 = 0.99  # few tokens per step: average the squared gradients a little longer

eval_interval = 250  # a val loss every 250 steps
eval_iters = 200  # over 200 batches (the whole val split is 111k characters)
log_interval = 10
checkpoint_interval = 500
