"""Fine-tune: LoRA on a small open model, evaluated, gated and registered in MLflow."""
