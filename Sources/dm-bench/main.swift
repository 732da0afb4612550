print("dm-bench: not yet")
