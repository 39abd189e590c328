"""Training recipes: flow-matching pretraining and the four distillation recipes, on one interface (`base.py`)."""
