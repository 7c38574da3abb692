# SmolLM2-135M (a Llama-family model: RMSNorm, SwiGLU, grouped-query attention, RoPE base 1e5)
# instruction-tuned on Stanford Alpaca with LoRA, in its own tokenizer and chat template:
# python prepare_alpaca.py --tokenizer=HuggingFaceTB/SmolLM2-135M --out_dir=data/alpaca_smollm2
# python train.py config/finetune_smollm2_alpaca_lora.py
# then ask it: python sample.py --out_dir=out-smollm2-alpaca-lora --start="Give three tips for staying healthy."
# docs/llama.md walks through it; everything not set here is config/finetune_alpaca_lora.py's choice.
out_dir = "out-smollm2-alpaca-lora"
dataset = "alpaca_smollm2"  # SmolLM2's tokens; meta.json names the tokenizer, which must match the model's
init_from = "HuggingFaceTB/SmolLM2-135M"  # the Hub name (transformers caches it), or a local folder of it

lora_rank = 16
lora_alpha = 32.0
lora_dropout = 0.05
lora_targets = "q,k,v,attn_proj,mlp_fc,mlp_proj"  # mlp_fc is SwiGLU's gate and up projections together
dropout = 0.0

# batch_size and total_batch_size count EXAMPLES for an SFT dataset (see config/finetune_alpaca.py)
block_size = 512  # prepare_alpaca.py's default --max_len; the model itself reads up to 8192 positions
batch_size = 16
total_batch_size = 64
group_by_length = True
max_iters = 2300  # ~3 epochs of ~49.4K examples at 64 per step

learning_rate = 3e-4  # LoRA's ~10x a full fine-tune's rate, as for GPT-2
min_lr = 3e-5
warmup_iters = 70
weight_decay = 0.0

eval_interval = 100
eval_iters = 40
log_interval = 10
checkpoint_interval = 200
