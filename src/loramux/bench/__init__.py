"""`loramux bench`: the three settings of unified fine-tuning and serving (inference only, fine-tuning
only, unified), measured beside transformers + PEFT and vLLM in the same run, with JSON, markdown and
PNG reports. See docs/benchmarks.md."""

# The settings live in this light module so that the `loramux bench` parser lists them without
# importing the benchmark's heavy modules (torch, matplotlib).
SETTINGS = ("inference", "finetune", "unified")
