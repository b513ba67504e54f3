"""Edge-QLoRA: open FPGA hardware for fine-tuning 4-bit quantized LLMs."""

__version__ = "0.1.0"
