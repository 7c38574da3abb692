# A reward model on Anthropic's HH-RLHF: GPT-2 124M fine-tuned on Alpaca, with a scalar head,
# trained to rank the preferred answer above the other (Bradley-Terry). PPO's reward.
# python prepare_preferences.py && python align.py config/align_reward_hh.py
method = "reward"
out_dir = "out-rm-hh"
init_from = "out-alpaca"
dataset = "hh_rlhf"
block_size = 512
batch_size = 8  # pairs per micro-batch
total_batch_size = 64
max_iters = 2500  # ~1 epoch: reward models overfit after one (InstructGPT trained one epoch)
learning_rate = 9e-6  # InstructGPT's reward-model rate, constant after the warmup
warmup_iters = 100
eval_interval = 250  # val pair accuracy: the number to watch
eval_iters = 40
log_interval = 10
checkpoint_interval = 500
