/* A tiny program for nsbuild's example package: prints a greeting. */
#include <stdio.h>

int main(int argc, char **argv)
{
    printf("Hello from a package built by nsbuild%s%s!\n", argc > 1 ? ", " : "",
           argc > 1 ? argv[1] : "");
    return 0;
}
