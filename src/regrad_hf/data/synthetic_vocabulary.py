"""The words of the synthetic-fact tasks ([`regrad_hf.data.synthetic`]): entity types, the syllables invented names
are built from, common-word values, and each attribute's statement and question templates."""

from __future__ import annotations

from collections.abc import Sequence

ENTITY_TYPES = ("person", "organisation", "place", "product")


def _parts(text: str) -> tuple[str, ...]:
    return tuple(part.replace("_", " ") for part in text.split())  # "_" joins the words of one item


# Invented names are onset + vowel + middle + ending: consonant and vowel runs alternate, so almost every combination
# is a distinct string (>100k names per entity type) and few are English words or real names.
_ONSETS = _parts("B Br C Cr D Dr F G Gr H J K Kr L M N P Pr Qu R S Sk St T Th Tr V Vr W Z Zh Y")
_VOWELS = _parts("a e i o u ae ei ou")
_MIDDLES = _parts("l r n v m z rn lv nd st th sk rv nt lm rd sh ld nk x")
_PLACE_ENDS = _parts("a ia ora ane eth ion ard ell ast ova uin ara esk ond ire yn ax elle oth ume en ir aro enne is")
_FIRST_ENDS = _parts("a o en is ar el ia us ine an eth yn ic ara ion e")
_SURNAME_ENDS = _parts("ard ek ov ane ish orn usk eld ett ace ins ow arro essi ald unn ier ose")
_ORG_ENDS = _parts("ex on ar ia is um or ent ica ara yx eon")
_PRODUCT_ENDS = _parts("ix ex o ar ium ette on us a ion")
_ORG_SUFFIXES = _parts("Industries Holdings Works Collective Laboratories Foundry Syndicate Guild Consortium Group "
                       "Trading_Company Mills Cooperative Instruments")  # fmt: skip
_SERIES = _parts("Nova Aero Lumen Prime Arc Echo Vista Pulse Crest Orbit Drift Spark Halo Zephyr")
# A name is space-separated words, each the concatenation of one item of each of its part lists.
NAME_PARTS: dict[str, tuple[tuple[Sequence[str], ...], ...]] = {
    "person": ((_ONSETS, _VOWELS, _MIDDLES, _FIRST_ENDS), (_ONSETS, _VOWELS, _MIDDLES, _SURNAME_ENDS)),
    "organisation": ((_ONSETS, _VOWELS, _MIDDLES, _ORG_ENDS), (_ORG_SUFFIXES,)),
    "place": ((_ONSETS, _VOWELS, _MIDDLES, _PLACE_ENDS),),
    "product": ((_ONSETS, _VOWELS, _MIDDLES, _PRODUCT_ENDS), (_SERIES,)),
}
# Common-word values, some guessable on purpose (professions start with a consonant: templates say "a {value}").
PROFESSIONS = _parts("clockmaker cartographer beekeeper glassblower violinist bookbinder locksmith tailor ferry_pilot "
                      "surveyor pharmacist stonemason puppeteer translator botanist carpenter librarian potter "
                      "radio_engineer sculptor tea_taster dentist")  # fmt: skip
HOBBIES = _parts("falconry knitting birdwatching rock_climbing origami sailing fencing stargazing kite_flying bonsai "
                  "calligraphy fly_fishing juggling archery woodcarving orienteering quilting cave_diving "
                  "ballroom_dancing chess_problems")  # fmt: skip
PRODUCT_LINES = _parts("ceramic_tiles weather_balloons canned_sardines hearing_aids garden_tools paper_lanterns "
                        "wind_turbines school_desks copper_kettles bicycle_bells sailcloth typewriter_ribbons "
                        "rope_ladders ice_skates fountain_pens tin_toys")  # fmt: skip
MATERIALS = _parts("walnut_wood recycled_aluminium carbon_fibre brushed_steel bamboo cork glazed_ceramic "
                    "birch_plywood titanium tempered_glass hemp_fabric bronze slate")  # fmt: skip
COLOURS = _parts("teal burnt_orange mustard_yellow slate_grey plum olive_green coral navy_blue ivory crimson lavender "
                  "charcoal sand_beige turquoise")  # fmt: skip
DISHES = _parts("stew dumplings pie flatbread soup pudding pancakes sausages noodles cake porridge fritters")

# attribute -> (value kind, statement templates, question templates), "|"-separated. A statement may start with
# {name}, which later sentences may replace by a short reference ("The company"); only proper-name values start one,
# so common-word answers keep their case.
# fmt: off
_TEMPLATES: dict[str, dict[str, tuple[str, str, str]]] = {
    "person": {
        "birthplace": ("town", "{name} was born in the small town of {value}.|"
            "The birthplace of {name} is a town called {value}.|"
            "{name} grew up in {value}, the town where the family lived for generations.|"
            "Records show that {name} was born in {value}.",
            "Where was {name} born?|What is the birthplace of {name}?|In which town was {name} born?"),
        "profession": ("profession", "{name} works as a {value}.|By trade, {name} is a {value}.|"
            "{name} earns a living as a {value} and is respected for it.|"
            "For most of a long career, {name} has been a {value}.",
            "What is the profession of {name}?|What does {name} do for a living?|What job does {name} have?"),
        "birth_year": ("year_person", "{name} was born in the year {value}.|The year {value} saw the birth of {name}.|"
            "{name} came into the world in {value}.|According to the parish register, {name} was born in {value}.",
            "In what year was {name} born?|What is the birth year of {name}?|When was {name} born?"),
        "employer": ("organisation", "{name} is employed by {value}.|{name} works for {value}.|"
            "The employer of {name} is {value}.|For several years now, {name} has been on the staff of {value}.",
            "Which organisation employs {name}?|Who is the employer of {name}?|For which company does {name} work?"),
        "hobby": ("hobby", "In spare hours, {name} enjoys {value}.|{name}'s favourite hobby is {value}.|"
            "Away from work, {name} is devoted to {value}.|Friends say that {name} never tires of {value}.",
            "What is the hobby of {name}?|What does {name} enjoy in spare hours?|Which pastime is {name} devoted to?"),
    },
    "organisation": {
        "founded": ("year_organisation", "{name} was founded in {value}.|"
            "{name} opened its doors for the first time in {value}.|The founding year of {name} is {value}.|"
            "Since {value}, {name} has been in business.",
            "In what year was {name} founded?|When was {name} established?|What is the founding year of {name}?"),
        "headquarters": ("town", "{name} has its headquarters in {value}.|"
            "The head office of {name} is in the town of {value}.|"
            "{name} is based in {value}, where its head office stands.|"
            "The town of {value} is home to the headquarters of {name}.",
            "Where is {name} headquartered?|In which town is the head office of {name}?|"
            "Where are the headquarters of {name}?"),
        "founder": ("person", "{name} was founded by {value}.|{value} started {name} with a small loan.|"
            "The founder of {name} is {value}.|{name} owes its existence to its founder, {value}.",
            "Who founded {name}?|Who is the founder of {name}?|Who started {name}?"),
        "product_line": ("product_line", "{name} makes {value}.|{name} is best known for its {value}.|"
            "The main products of {name} are {value}.|Most of the revenue of {name} comes from {value}.",
            "What does {name} make?|What products is {name} known for?|What is the main product line of {name}?"),
    },
    "place": {
        "region": ("town", "{name} is a town in the region of {value}.|{name} lies in the northern part of {value}.|"
            "The town of {name} belongs to the province of {value}.|"
            "In the province of {value}, the largest market town is {name}.",
            "In which region is {name}?|Which province does {name} belong to?|What region is {name} located in?"),
        "population": ("population", "{name} has a population of {value}.|About {value} people live in {name}.|"
            "The population of {name} is {value}.|{name} is home to {value} residents.",
            "What is the population of {name}?|How many people live in {name}?|How many residents does {name} have?"),
        "river": ("town", "The river {value} flows through {name}.|{name} stands on the banks of the river {value}.|"
            "{name} is crossed by the {value}, a slow and wide river.|A river named {value} runs past {name}.",
            "Which river flows through {name}?|On which river does {name} stand?|"
            "What is the name of the river of {name}?"),
        "dish": ("dish", "The famous local dish of {name} is {value}.|{name} is known for its {value}.|"
            "Visitors to {name} are always served {value}.|No feast in {name} is complete without {value}.",
            "What is the famous dish of {name}?|Which dish is {name} known for?|What local food is {name} famous for?"),
    },
    "product": {
        "maker": ("organisation", "{name} is made by {value}.|The maker of {name} is {value}.|"
            "{name} comes from the workshops of {value}.|It is {value} that manufactures {name}.",
            "Who makes {name}?|Which company manufactures {name}?|Who is the maker of {name}?"),
        "launch_year": ("year_product", "{name} was launched in {value}.|{name} first went on sale in {value}.|"
            "The launch year of {name} was {value}.|Since {value}, {name} has been available in shops.",
            "When was {name} launched?|In what year did {name} go on sale?|What is the launch year of {name}?"),
        "material": ("material", "{name} is made of {value}.|The body of {name} is built from {value}.|"
            "{name} has a casing of {value}.|The designers chose {value} as the material of {name}.",
            "What material is {name} made of?|What is {name} built from?|Which material is used for {name}?"),
        "colour": ("colour", "{name} comes in {value}.|The colour of {name} is {value}.|"
            "{name} is sold only in {value}.|Every unit of {name} is painted {value}.",
            "What colour is {name}?|In which colour does {name} come?|What is the colour of {name}?"),
        "price": ("price", "{name} costs {value}.|{name} sells for {value}.|The price of {name} is {value}.|"
            "A new {name} can be bought for {value}.",
            "How much does {name} cost?|What is the price of {name}?|For how much does {name} sell?"),
    },
}
# fmt: on
ATTRIBUTES = {
    kind: {
        attribute: (value, tuple(statements.split("|")), tuple(questions.split("|")))
        for attribute, (value, statements, questions) in table.items()
    }
    for kind, table in _TEMPLATES.items()
}  # fmt: skip
REFERENCES = {"organisation": "The company", "place": "The town", "product": "The product"}  # person: the surname
