"""``mmssl bench NAME``: each benchmark a module, each printing a table and ratios against a reference run in the
same process (`device`: the device, clocks, matmul peak and memory every one of them measures the same way)."""
