"""The built-in trainer's model: a small GPT (models/gpt.py), in the core because exports and
`trainer.generate` rebuild it from a checkpoint's weights and config (`gpt_from_weights`)."""
