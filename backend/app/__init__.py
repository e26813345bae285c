"""The entry points: the command line (``cli``, ``file_commands``, ``models_cli``), the stdio worker (``server``) and the job runner
(``job``). The only place that parses arguments or protocol requests into jobs; may import every other layer.
"""
