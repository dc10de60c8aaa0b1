"""gemini_pretrain (installed as nnunet_gemini.pretraining)."""
