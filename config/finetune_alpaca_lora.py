# GPT-2 small (124M) instruction-tuned on Stanford Alpaca with LoRA: the pretrained weights stay
# frozen, low-rank adapters on every linear of every block are trained (2.65M parameters, 2.1%).
# python prepare_alpaca.py && python train.py config/finetune_alpaca_lora.py
# then ask it: python sample.py --out_dir=out-alpaca-lora --start="Give three tips for staying healthy."
# ckpt.pt holds the adapters (~11 MB; ~32 MB with their AdamW moments) and the name of the base ("gpt2").
out_dir = "out-alpaca-lora"
dataset = "alpaca"  # data/alpaca from prepare_alpaca.py: meta.json says "format": "sft"
init_from = "gpt2"  # the frozen base (transformers downloads it once)

lora_rank = 16  # r: instruction following is a bigger change than one writing style, so more than 8
lora_alpha = 32.0  # updates scaled by alpha / r = 2; keep alpha when trying another r
lora_dropout = 0.05  # on the adapters' input only
# every linear of the blocks: QLoRA (Dettmers et al. 2023) found adapters on all of them
# necessary to match a full fine-tune on instruction data; "q,v" alone trains faster but learns less
lora_targets = "q,k,v,attn_proj,mlp_fc,mlp_proj"
dropout = 0.0  # the frozen base runs exactly as pretrained

# batch_size and total_batch_size count EXAMPLES for an SFT dataset (see config/finetune_alpaca.py)
block_size = 512  # prepare_alpaca.py's default --max_len
batch_size = 16
total_batch_size = 64
group_by_length = True  # steps of similar-length examples: ~2x fewer padding positions (see finetune_alpaca.py)
max_iters = 2300  # ~3 epochs, the same data and steps as the full fine-tune, to compare them

# adapters start at zero (B = 0) and Adam moves each entry by about the learning rate per step:
# LoRA wants a rate ~10x a full fine-tune's
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 70
weight_decay = 0.0

eval_interval = 100
eval_iters = 40
log_interval = 10
checkpoint_interval = 200  # an adapter checkpoint is small: cheap to write often
