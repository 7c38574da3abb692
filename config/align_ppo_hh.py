# PPO (RLHF as in InstructGPT) on HH-RLHF's prompts, against the reward model of
# config/align_reward_hh.py, starting from the Alpaca SFT run.
# python align.py config/align_reward_hh.py && python align.py config/align_ppo_hh.py
method = "ppo"
out_dir = "out-ppo-hh"
init_from = "out-alpaca"  # the policy's start and the KL penalty's reference
reward_from = "out-rm-hh"
dataset = "hh_rlhf"  # its prompts; the answers are sampled
block_size = 512
batch_size = 16  # prompts per rank and iteration: 16 rollouts
max_new_tokens = 128
temperature = 1.0
kl_coef = 0.05  # per-token KL penalty
ppo_epochs = 4
clip_range = 0.2
max_iters = 1000  # rollout iterations (x ppo_epochs optimizer steps)
learning_rate = 1e-6
warmup_iters = 20
eval_interval = 100  # the mean reward and KL of answers to 16 val prompts
log_interval = 10
checkpoint_interval = 200
