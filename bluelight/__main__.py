from bluelight.entry import main

main()
