from zsclip.cli import main

main()
