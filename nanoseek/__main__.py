from nanoseek.cli import main

main()
