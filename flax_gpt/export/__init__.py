"""Exports: the Hugging Face folder (`hf_folder`), its model card (`card`), the Hub push (`hub`)."""
