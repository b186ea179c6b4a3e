"""Stage merge: fold the LoRA adapter into the base model (plan, safetensors I/O, backends, verification)."""
