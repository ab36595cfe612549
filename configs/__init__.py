"""ml_collections config files, one per model or distillation pair (``get_config(arg)``)."""
