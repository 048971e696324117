"""The keys of a `RUN_DIR/metrics.jsonl` record (**contract**), declared once.

The writers (the train step, the loop, the evaluator, `Throughput`) and the readers (the report, its
plots, the model card, the checkpoints' best step) name a key through these constants, so renaming
or adding one is one line here. The strings are what is on disk, in TensorBoard's tags
(`train/<key>`, `eval/<key>`) and in the JSON `train` and `eval` print.

Every record carries STEP. A train line carries LOSS, LR, GRAD_NORM and TOKENS_SEEN, and, when the
step was timed (not the first step of a run, nor one after an evaluation), the timing keys. An
eval line carries VAL_LOSS, PERPLEXITY and EVAL_TOKENS. A checkpoint's Orbax metrics carry VAL_LOSS
too (the best checkpoint), so renaming it leaves older checkpoints without a best step.
"""

STEP = "step"  # int: optimizer steps completed when the record was taken (an eval at STEP saw those steps)

# Train lines (the readers take a line with LOSS for a train line).
LOSS = "loss"  # mean cross-entropy over the step's target tokens, all micro-batches (nats/token)
LR = "lr"  # the learning rate the step's update used (the schedule at the step before it)
GRAD_NORM = "grad_norm"  # global L2 norm of the step's accumulated gradients, before clipping
TOKENS_SEEN = "tokens_seen"  # int: tokens trained on up to and including this step (STEP x batch x seq_len)

# Train lines of timed steps (`Throughput.summary`, in this order).
STEP_TIME_S = "step_time_s"  # wall-clock seconds of the step (from the previous step's metrics fetch to its own)
TOKENS_PER_SEC = "tokens_per_sec"  # tokens per second over all devices
TOKENS_PER_SEC_PER_DEVICE = "tokens_per_sec_per_device"  # TOKENS_PER_SEC / the device count
MODEL_FLOPS_PER_SEC_PER_DEVICE = "model_flops_per_sec_per_device"  # training model FLOP/s of one device
MFU = "mfu"  # model-FLOPs utilisation, a fraction in [0, 1] of one device's bf16 peak; absent without a known peak

# Eval lines (a line with VAL_LOSS is an eval line: TensorBoard tags it eval/, the readers select by it).
VAL_LOSS = "val_loss"  # mean cross-entropy over the validation split's target tokens (nats/token)
PERPLEXITY = "perplexity"  # exp(VAL_LOSS), capped at exp(700)
EVAL_TOKENS = "tokens"  # int: target tokens the evaluation scored
