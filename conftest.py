# Lets `pytest` import bert/, glue/, regularizers/ and the top-level scripts from the repo root.
