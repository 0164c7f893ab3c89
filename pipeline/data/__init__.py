"""What a user's data goes through: one record reader (records.py), one prompt extractor (prompts.py), chat
conversations for SFT (conversations.py), rankings in every preference format (rankings.py), comparison collection
(comparisons.py) and token packing (packing.py)."""
