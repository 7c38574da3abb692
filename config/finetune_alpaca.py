# GPT-2 small (124M) instruction-tuned on Stanford Alpaca's 52K examples, every weight trained.
# python prepare_alpaca.py && python train.py config/finetune_alpaca.py
# then ask it: python sample.py --out_dir=out-alpaca --start="Give three tips for staying healthy."
# ckpt.pt holds the whole model and AdamW's two moments for each weight (~1.5 GB).
out_dir = "out-alpaca"
dataset = "alpaca"  # data/alpaca from prepare_alpaca.py: meta.json says "format": "sft"
init_from = "gpt2"  # OpenAI's weights (transformers downloads them once)
lora_rank = 0  # no LoRA: all weights train (config/finetune_alpaca_lora.py is the LoRA run)
dropout = 0.0  # Alpaca trained without dropout; 3 passes over 52K examples hardly overfit 124M

# An SFT dataset is read in whole examples, so batch_size and total_batch_size count EXAMPLES
# here, not tokens. Each micro-batch is padded to its longest example, at most block_size.
block_size = 512  # prepare_alpaca.py's default --max_len: the few longer examples were dropped there
batch_size = 16  # examples per micro-batch on each GPU
total_batch_size = 64  # examples per optimizer step (Alpaca used 128 for LLaMA-7B)
# Alpaca's responses run from a word to a few hundred tokens: padded together at random, a
# micro-batch is often mostly padding. Grouping fills each step with examples of similar
# length (the same examples per epoch): about 2x the tokens/s on such skewed lengths.
group_by_length = True
max_iters = 2300  # ~3 epochs: ~49.4K train examples / 64 per step = ~772 steps an epoch (Alpaca: 3 epochs)

# small steps, as in any full fine-tune: the pretrained weights are already good
learning_rate = 3e-5
min_lr = 3e-6  # cosine decay to learning_rate / 10 at max_iters
warmup_iters = 70  # 3% of the run, as Alpaca did
weight_decay = 0.0  # Alpaca used none

eval_interval = 100  # the val loss (on responses only) every 100 steps shows when it stops falling
eval_iters = 40  # 40 x 16 = 640 of the ~2.6K val examples
log_interval = 10
checkpoint_interval = 500  # ~1.5 GB per write
