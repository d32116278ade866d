"""Files in and out, never a tensor: input listing and decoding (:mod:`.sources`), the one
reader of mask files (:mod:`.masks`), output names (:mod:`.naming`), atomic files and logs
(:mod:`.files`), image and array writers (:mod:`.writers`), the prompt file
(:mod:`.conditionals`) and the review page (:mod:`.report`)."""
