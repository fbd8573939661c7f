"""Speech engines behind one interface (:mod:`.base`): Edge's voices, and eSpeak NG offline."""
