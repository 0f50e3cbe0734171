"""Streaming training data from shards: every sample once per epoch, the same number of steps on every rank.

The plan, per epoch e (all of it follows from the seed, so every rank computes it alone, without talking):

1. the epoch's sequence: the training samples of the run's shard sets in their shares (`launcher.mixing.Mix`:
   with one set, its shards in a seeded order for epoch e, their samples in that order; with several, each set's
   share of its own passes, interleaved evenly), N samples in all (the counts come from index.json, nothing is read
   to plan);
2. the sequence is cut into one contiguous range per rank (sizes differ by at most one) and each rank's
   range into one contiguous range per loader worker, so a worker reads only the shards its range covers (with
   several sets, a run of each set's shards, read side by side);
3. a worker reads its range in blocks of `shuffle_buffer` samples and takes each block in a seeded order;
4. its clips, in that order, become training samples: one each, or with `data.pack` windows of several
   (launcher/packing.py), which never span two epochs nor two languages. A sample's labels (launcher/labels.py)
   start with its own set's language token and take the timestamp layout and a prompt by seeded draws that depend
   on the sample's first clip only.

Each worker's stream runs on into the next epoch, so no rank ever runs dry: a run lasts `max_steps` optimizer
steps on every rank (never "until the data ends", which hangs DeepSpeed when ranks hold unequal data), and
within each epoch every clip is seen exactly once (with several sets: every clip of a set once per pass over
that set).

Resuming on the same number of ranks and workers replays the plan and skips the batches already taken, without
decoding them: the run goes on exactly as if never stopped. On another number (a 2-GPU run resumed on 1, say),
each checkpoint's record of what every worker had trained on (`TrainedPositions`) gives a new plan: the epochs still
open keep only their unseen positions, cut as above among the new ranks and workers (`DataPlan`, `resume_position`).

Modules: `plan` (positions per rank and worker, resume), `mixing` (several shard sets), `stream` (reading, shuffling,
packing, labelling), `loader` (collate, the DataLoader), `packing` (windows of clips), `labels` (label layouts).
"""
