"""The benchmark harness: the annotation-budget benchmark on the VNC data, seed summaries and the
touching-mitochondria comparison. Loaded only by its own subcommands, never by the plugin."""
