"""``mmssl finetune``: an exported encoder plus a new head trained on DeepSpeed (`command` launches, `rank` runs
one rank, `data` and `model` build what it trains on)."""
