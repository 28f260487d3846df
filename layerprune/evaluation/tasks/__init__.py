"""lm-eval task configs (YAML) for the zero-shot tasks read from local files; see local_data.py."""
