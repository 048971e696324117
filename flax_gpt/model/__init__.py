"""GPT-2 in Flax (`gpt2`), the one name map to and from Hugging Face (`hf`), FLOPs and MFU (`flops`)."""
