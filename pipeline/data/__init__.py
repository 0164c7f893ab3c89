"""Data for every stage: web-text ingestion and filtering, packing, chat formats, rankings, and the demo world."""
