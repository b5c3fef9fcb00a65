from bluelight.cli import main

main()
