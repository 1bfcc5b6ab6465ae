"""Moderation of (prompt, response) pairs with a trained moderation model
(the severity-sensitive moderation of PKU-SafeRLHF, Ji et al. 2024, arXiv:2406.15513).

    from jaxalign.moderation import api
    results = api.moderate([("How do I bake bread?", "Mix flour...")], "out/moderation_tiny/export")
    results[0]["is_safe"], results[0]["unsafe_probability"], results[0]["severity"]

`jaxalign moderate --model DIR --input FILE.jsonl` (commands.py) runs the same API over a file.
"""
