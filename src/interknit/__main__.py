from interknit.cli import main

main()
