from trntrain.cli import main

main()
