# GPT-2 small (124M) fine-tuned on Shakespeare, every weight trained: the baseline that
# config/finetune_shakespeare_lora.py is compared with (same data, steps and batch).
# python prepare_shakespeare.py --tokenizer=gpt2 && python train.py config/finetune_shakespeare.py
# ckpt.pt holds the whole model and AdamW's two moments for each of its weights (~1.5 GB).
out_dir = "out-shakespeare-ft"
dataset = "shakespeare"  # data/shakespeare: GPT-2 BPE, ~304k train and ~34k val tokens
init_from = "gpt2"  # OpenAI's weights (transformers downloads them once)
lora_rank = 0  # no LoRA: all weights train

dropout = 0.1  # 124M parameters against 0.3M tokens overfit fast: regularise (GPT-2 itself used 0.1)

block_size = 256  # GPT-2's 1024 positions cropped to 256: 4x cheaper, and speeches are short
batch_size = 16  # sequences per micro-batch
total_batch_size = 4096  # tokens per optimizer step (16 x 256): one micro-batch on one GPU
max_iters = 200  # 200 x 4096 = 0.8M tokens, about 2.7 passes over the training text

# small steps: the weights are already good, and large updates to all of them forget what
# pretraining taught faster than Shakespeare can replace it
learning_rate = 3e-5
min_lr = 3e-6  # cosine decay to learning_rate / 10 at max_iters
warmup_iters = 20
weight_decay = 0.1

eval_interval = 25  # validation loss every 25 steps shows when it starts to overfit
eval_iters = 8  # 8 x 16 x 256 = 33k tokens: about the whole validation text
log_interval = 5
checkpoint_interval = 0  # ~1.5 GB per write: only at the end
