"""Reports over finished runs (``composer-ext report KIND RUN_DIR...``): PNG figures and CSV/Markdown tables."""
