"""Tasks and their data: shared types (`types`), the offline built-in tasks (`tasks`, from packages
fetched by `assets`), the user's own files (`userfiles`), batching (`batching`) and scoring (`metrics`)."""
