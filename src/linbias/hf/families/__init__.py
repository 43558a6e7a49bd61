"""One unit per transformers ALiBi family: its classes, config fields, slopes, bias builders and
attention, for every transformers release linbias.hf supports. Adding a family, or porting one to
a new release, touches its file only; ``linbias.hf.patch`` holds what they share."""
