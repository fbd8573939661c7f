"""The speech core both doors use: routing and upstream protection, limits, keys, counters."""
