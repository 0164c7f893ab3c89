"""Stage 1a, web text (`rlhf webtext`, recipe section `webtext:`, run folder `run_dir/webtext/`): a crawl extracted,
filtered and deduplicated with datatrove into parquet shards for pretraining.

    stage.py      the stage: inputs, run, final/ splits
    passes.py     the datatrove passes, their executors (local, Slurm, Ray) and their statistics
    filters.py    offline-safe datatrove steps (tolerant WARC reader, language ID, bad words, split tagger)
    stopwords.py  stop-word lists of the language filter used without a fastText model
"""
