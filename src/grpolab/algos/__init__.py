"""The math of GRPO and its variants as pure tensor functions: no I/O, no globals, no modules.

Shapes: B sequences (prompts x group_size), T completion positions, V vocabulary.
"""
