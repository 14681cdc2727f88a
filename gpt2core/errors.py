"""UserError: input the user can fix, said in one sentence that names the problem and the fix.

Every refusal of bad input in gpt2core and the pipelines is a UserError or one of its kinds
(TokenizerError, ModelFileError, StorageError, CorpusError, DatasetError, RunError, ...). A
stage's `main()` prints it as one line and exits with status 2 (pipelines/common/entry.py);
anything else, a ValueError from inside numpy or torch included, is a bug or a failure and
keeps its traceback. It is a ValueError, so a library caller that catches ValueError still does.
"""


class UserError(ValueError):
    """Bad input, in one sentence naming the problem and the fix."""
