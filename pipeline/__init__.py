"""Each pipeline step as a plain function, shared by the `landcover` CLI and the Prefect flows."""
