"""The speech core both doors use: admission, the utterance run, the cache layer, routing and
upstream protection."""
