"""`loramux bench`: the three settings of unified fine-tuning and serving (inference only, fine-tuning
only, unified), measured beside transformers + PEFT and vLLM in the same run, with JSON, markdown and
PNG reports. See docs/benchmarks.md."""
