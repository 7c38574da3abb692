# A vision-language model from scratch on the synthetic shapes task, on a laptop CPU in ~5 minutes:
# a small ViT (32x32 images, 4x4 patches, 16 image tokens after the pixel shuffle) and a small
# character-level GPT, trained together on questions about colored shapes.
# First: python prepare_vision.py --synthetic=4000 --tokenizer=char --image_size=32 --out_dir=data/shapes
# then:  python train_vision.py config/vision_shapes_cpu.py ; python vision.py --out_dir=out-vision-shapes
# (the CPU threads are picked by timing the first steps, as train.py does; --cpu_threads=N chooses)
out_dir = "out-vision-shapes"  # the run's checkpoint and log.txt
dataset = "shapes"  # data/shapes/, from prepare_vision.py --synthetic
device = "cpu"  # the laptop recipe (a GPU takes it with --device=cuda)
batch_size = 64  # examples per step (fewer, larger steps learned the image faster than 32)
block_size = 66  # the longest question and answer (51 characters, the placeholder one) + 16 image tokens - 1
n_layer = 3  # the LM: 3 layers, 128 wide
n_head = 4  # 32 channels a head
n_embd = 128  # the LM's width
vit_layers = 3  # the ViT: 3 layers, 128 wide, over 64 patches of 4x4 pixels
vit_heads = 4  # 32 channels a head, as the LM
vit_embd = 128  # the ViT's width
patch_size = 4  # 4x4-pixel patches: an 8x8 grid of the 32x32 image
shuffle = 2  # 2x2 patches -> one LM token: 16 image tokens
learning_rate = 1e-3  # at 3e-3 the model read pictures as a bag of colors longer (docs/vision.md: what was tried)
min_lr = 1e-4  # the cosine's floor: a tenth of the peak
warmup_iters = 50  # linear warmup steps
max_iters = 800  # ~5 minutes on 2 CPU cores (docs/vision.md: twice the steps, a little more)
weight_decay = 0.0  # none: a short run on a small set
eval_interval = 200  # the val loss and accuracy four times in the run
eval_iters = 10  # val batches for the val loss
eval_questions = 300  # val questions answered for the accuracy
log_interval = 25  # a log line every 25 steps
