"""What the audio is sent as: the table of formats, and the transcoder that makes them."""
