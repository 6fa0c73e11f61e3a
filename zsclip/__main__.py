from zsclip.cli import run

run()
