from gdpm.cli import main

main()
