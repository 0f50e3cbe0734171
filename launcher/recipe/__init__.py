"""Recipes: the schema (`schema`), reading and validating YAML with --set overrides (`load`), the checks against
the data and the model (`checks`), the DeepSpeed config (`ds_config`) and the memory model (`memory`)."""
